"""What the tests that interrupt a child process share."""
import signal


def default_sigint() -> None:
    """preexec_fn for a child that a test interrupts with SIGINT: a shell running the suite in the background
    starts it with SIGINT ignored, which Python (and so the child) would keep; restore the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
