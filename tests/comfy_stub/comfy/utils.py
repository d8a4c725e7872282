"""Stand-in for comfy.utils: ProgressBar with ComfyUI's hook semantics (the hook checks for cancel)."""

PROGRESS_BAR_HOOK = None
UPDATES = []  # (value, total) of every update, for tests


def reset_records():
    """Forget every recorded update (run before each test, so no test reads another's)."""
    UPDATES.clear()


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        UPDATES.append((self.current, self.total))
        from comfy.model_management import throw_exception_if_processing_interrupted

        throw_exception_if_processing_interrupted()

    def update(self, value):
        self.update_absolute(self.current + value)
