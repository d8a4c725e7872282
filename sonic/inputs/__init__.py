"""What goes into a generation: speech (`audio`), the portrait (`image`), its face (`face`) and inputs fetched
from http(s) (`urls`, which refuses the server's own network)."""
