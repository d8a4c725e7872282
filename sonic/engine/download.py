"""`python -m sonic download`: the model files of the README's layout from the Hugging Face Hub, verified.

Files come through `huggingface_hub` (its endpoint `HF_ENDPOINT`, its token `HF_TOKEN` or `hf auth login`, its
progress bars, its retries that resume a cut connection, its local-folder metadata so that a second run fetches
nothing). Every file fetched is checked against the hub's own size and hash (sha256 for large files, the git
blob hash for small ones) and every component is then opened the way Sonic opens it: the Sonic and RIFE
checkpoints must fit the networks built from their configs tensor for tensor (`checkpoints.check_state_dict`),
the transformers / diffusers folders must load without a missing or mis-shaped weight. A file that fails is
deleted, so nothing unusable stays in the layout, and the error says what to do.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..hashing import sha256_file
from ..hub import SONIC_REPO, SVD_REPO, WHISPER_REPO
from .checkpoints import SVD_DIR, WHISPER_DIR, YOLO_FILE, ModelLayout

COMPONENTS = ("sonic", "whisper", "svd", "rife", "yolo")
DEFAULT_COMPONENTS = COMPONENTS


@dataclass(frozen=True)
class RemoteFile:
    component: str
    repo: str
    filename: str  # path inside the repository
    subdir: str  # folder inside the models folder that mirrors the repository ("" = the models folder)

    @property
    def relative(self) -> str:
        return f"{self.subdir}/{self.filename}" if self.subdir else self.filename

    def url(self, endpoint: str | None) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, self.filename, endpoint=endpoint)


def plan(components=DEFAULT_COMPONENTS, fp16: bool = False) -> list[RemoteFile]:
    """The files of the README's layout for the chosen components (fp16: SVD's half-precision VAE and CLIP)."""
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"--only: unknown component {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    half = ".fp16" if fp16 else ""
    files = {
        "sonic": [RemoteFile("sonic", SONIC_REPO, f"Sonic/{n}.pth", "") for n in ("unet", "audio2token",
                                                                                   "audio2bucket")],
        "rife": [RemoteFile("rife", SONIC_REPO, "RIFE/flownet.pkl", "")],
        "yolo": [RemoteFile("yolo", SONIC_REPO, YOLO_FILE, "")],
        "whisper": [RemoteFile("whisper", WHISPER_REPO, n, WHISPER_DIR)
                    for n in ("config.json", "model.safetensors", "preprocessor_config.json")],
        "svd": [RemoteFile("svd", SVD_REPO, n, SVD_DIR)
                for n in ("unet/config.json", "scheduler/scheduler_config.json", "vae/config.json",
                          f"vae/diffusion_pytorch_model{half}.safetensors", "image_encoder/config.json",
                          f"image_encoder/model{half}.safetensors")],
    }
    return [f for name in COMPONENTS if name in components for f in files[name]]


def parse_only(values: list[str] | None) -> tuple[str, ...]:
    """`--only sonic --only whisper` or `--only sonic,whisper`; none given = every component."""
    if not values:
        return DEFAULT_COMPONENTS
    return tuple(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


@dataclass
class Fetched:
    file: RemoteFile
    path: Path
    size: int
    downloaded: bool  # False when the file was already there and unchanged


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(exc: Exception, item: RemoteFile, endpoint: str) -> Exception:
    """huggingface_hub's exceptions as built-in ones with what to do."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{item.repo}"
    if isinstance(exc, errors.GatedRepoError):
        return PermissionError(
            f"{item.repo} is gated: open {page} while logged in, accept its licence, then make a token available "
            "(HF_TOKEN=... or `hf auth login`) and run the command again. With ComfyUI you can skip it: "
            "--only sonic,whisper,rife and connect an SVD checkpoint's VAE and CLIP_VISION to Sonic Model Loader")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return FileNotFoundError(f"repository {item.repo} not found at {endpoint} (or it needs a token: set "
                                 f"HF_TOKEN); check HF_ENDPOINT")
    if isinstance(exc, (errors.EntryNotFoundError, errors.RevisionNotFoundError)):
        return FileNotFoundError(f"{item.filename} not found in {item.repo} at {endpoint}; check HF_ENDPOINT "
                                 f"(a mirror may lack it) or leave the component out with --only")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return ConnectionError("HF_HUB_OFFLINE is set: unset it to download")
    return ConnectionError(
        f"could not download {item.filename} from {item.repo} at {endpoint}: {_root_cause(exc)}. Check the "
        "network connection (and HF_ENDPOINT / a proxy), then run the same command again: finished files are kept")


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_matches(path: Path, etag: str | None) -> bool | None:
    """True/False against the hub's etag (sha256 of LFS files, git blob sha1 of the others); None if unknown."""
    etag = (etag or "").strip('"').removeprefix("W/").strip('"').lower()
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        return sha256_file(path)[0] == etag
    if len(etag) == 40 and all(c in "0123456789abcdef" for c in etag):
        return _git_blob_sha1(path) == etag
    return None


def _local_dir(layout: ModelLayout, item: RemoteFile) -> Path:
    """The folder that mirrors the item's repository (huggingface_hub keeps its records in `.cache` there)."""
    return layout.root / item.subdir if item.subdir else layout.root


def _forget(local_dir: Path, item: RemoteFile) -> None:
    """Delete a bad file and huggingface_hub's record of it, so that the next run downloads it again."""
    (local_dir / item.filename).unlink(missing_ok=True)
    meta = local_dir / ".cache" / "huggingface" / "download" / f"{item.filename}.metadata"
    meta.unlink(missing_ok=True)


def _present_as_safetensors(layout: ModelLayout, item: RemoteFile) -> bool:
    """A Sonic or RIFE pickle whose `.safetensors` twin (`python -m sonic convert`) is already there."""
    if item.repo != SONIC_REPO or not item.filename.endswith((".pth", ".pkl")):
        return False
    return (layout.root / Path(item.filename).with_suffix(".safetensors")).is_file()


def fetch(models_dir: str | os.PathLike, components=DEFAULT_COMPONENTS, fp16: bool = False,
          tqdm_class=None, on_start: Callable[[int, int], None] | None = None,
          log: Callable[[str], None] = print) -> list[Fetched]:
    """Download what is missing or outdated, check each file against the hub's size and hash.

    `on_start(files, total_bytes)` is called once the sizes are known (ComfyUI's progress bar); `tqdm_class`
    is handed to huggingface_hub for per-file progress."""
    from huggingface_hub import errors, get_hf_file_metadata, hf_hub_download

    if _offline():
        raise ConnectionError("HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it (or copy the files "
                              "into the layout by hand, see README 'Model files')")
    layout = ModelLayout(Path(models_dir))
    endpoint = _endpoint()
    items = [f for f in plan(components, fp16) if not _present_as_safetensors(layout, f)]
    # per-file progress hook (huggingface_hub 1.x); older versions show their own bars only
    progress = {"tqdm_class": tqdm_class} if tqdm_class is not None and "tqdm_class" in inspect.signature(
        hf_hub_download).parameters else {}
    metadata = {}
    for item in items:
        try:
            metadata[item] = get_hf_file_metadata(item.url(endpoint))
        except Exception as exc:  # noqa: BLE001 - every hub/network failure becomes one clear built-in error
            raise _hub_error(exc, item, endpoint) from exc
    todo = [i for i in items if not ((layout.root / i.relative).is_file()
                                     and (layout.root / i.relative).stat().st_size == metadata[i].size)]
    if on_start is not None:
        on_start(len(todo), sum(metadata[i].size or 0 for i in todo))
    results = []
    for item in items:
        local_dir = _local_dir(layout, item)
        target = local_dir / item.filename
        before = _stat(target)
        try:
            path = Path(hf_hub_download(item.repo, item.filename, local_dir=local_dir, endpoint=endpoint,
                                        **progress))
        except (errors.HfHubHTTPError, OSError, ValueError) as exc:  # not ComfyUI's Cancel: that passes through
            if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)) and not isinstance(
                    exc, errors.HfHubHTTPError):
                raise  # the models folder itself: its own message names the path
            raise _hub_error(exc, item, endpoint) from exc
        downloaded = _stat(path) != before
        meta = metadata[item]
        size = path.stat().st_size
        if meta.size is not None and size != meta.size:
            _forget(local_dir, item)
            raise ValueError(f"{item.relative}: {size:,} bytes on disk, the hub says {meta.size:,}; the file was "
                             "deleted: run the same command again")
        if downloaded and _hash_matches(path, meta.etag) is False:
            _forget(local_dir, item)
            raise ValueError(f"{item.relative} from {endpoint} is corrupt: its hash differs from the hub's "
                             f"({meta.etag}). It was deleted: run the same command again")
        if downloaded:
            log(f"downloaded {item.relative} ({size:,} bytes, hash checked)")
        results.append(Fetched(item, path, size, downloaded))
    return results


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def verify(models_dir: str | os.PathLike, components=DEFAULT_COMPONENTS,
           fp16: bool = False) -> list[tuple[tuple[Path, ...], str]]:
    """Open every component the way Sonic does (on the meta device where it can): (files, problem) for each that
    does not open; empty = all good. Nothing stays loaded."""
    import torch

    from . import loader
    from .models.audio_proj import AudioToBucket, AudioToTokens

    layout = ModelLayout(Path(models_dir))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    problems: list[tuple[tuple[Path, ...], str]] = []

    def check(files: tuple[Path, ...], fn) -> None:
        try:
            fn()
        except (ValueError, FileNotFoundError, OSError, RuntimeError, KeyError) as exc:
            problems.append((files, str(exc)))

    tokens = {}

    def unet() -> None:
        loader.load_unet(layout, tokens["net"].token_dim, meta, torch.float32)

    if "sonic" in components:
        check((layout.audio2token,),
              lambda: tokens.update(net=loader.load_audio_mlp(AudioToTokens, layout.audio2token, meta)))
        check((layout.audio2bucket,), lambda: loader.load_audio_mlp(AudioToBucket, layout.audio2bucket, meta))
        if "net" in tokens:  # the UNet's audio width comes from audio2token
            check((layout.unet,), unet)
    if "rife" in components:
        check((layout.rife,), lambda: loader.load_rife(layout.rife, meta))
    if "yolo" in components:
        check((layout.yolo,), lambda: torch.jit.load(str(layout.yolo), map_location="cpu"))
    if "whisper" in components:
        check(tuple(layout.whisper.glob("*.*")), lambda: loader.load_whisper(layout, cpu))
    if "svd" in components:
        dtype = torch.float16 if fp16 else torch.float32
        check(tuple((layout.svd / "vae").glob("*.*")), lambda: loader.load_vae(layout, cpu, dtype))
        check(tuple((layout.svd / "image_encoder").glob("*.*")),
              lambda: loader.load_image_encoder(layout, cpu, dtype))
    return problems


def download(models_dir: str | os.PathLike, components=DEFAULT_COMPONENTS, fp16: bool = False,
             tqdm_class=None, on_start=None, log: Callable[[str], None] = print) -> list[Fetched]:
    """fetch + verify. Files fetched now that belong to a component that does not open are deleted (a second
    download would give the same bytes: the server's file is not the official one) and a ValueError says so."""
    fetched = fetch(models_dir, components, fp16, tqdm_class=tqdm_class, on_start=on_start, log=log)
    problems = verify(models_dir, components, fp16)
    if problems:
        layout = ModelLayout(Path(models_dir))
        bad = {p.resolve() for files, _ in problems for p in files}
        for item in fetched:
            if item.downloaded and item.path.resolve() in bad:
                _forget(_local_dir(layout, item.file), item.file)
        raise ValueError(f"downloaded files do not fit Sonic's networks, so they are not the official files (check "
                         f"HF_ENDPOINT, now {_endpoint()}): " + "; ".join(m for _, m in problems)
                         + ". Files downloaded by this run that failed were deleted.")
    return fetched
