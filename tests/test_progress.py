"""Progress bars: a log file gets a handful of lines, not one per poll."""
import io

from cpcluster.util.progress import LOG_INTERVAL_S, advance_to, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _draws(stream, polls=2000):
    bar = progress_bar(polls, unit="draw", desc="certify", stream=stream)
    for done in range(1, polls + 1):
        advance_to(bar, done)
        advance_to(bar, done - 1)  # a poll that sees less than before never moves the bar back
    bar.close()
    return bar, stream.getvalue()


def test_a_log_file_gets_the_first_and_the_final_state_only_when_polls_are_fast():
    bar, text = _draws(io.StringIO())
    assert bar.mininterval == LOG_INTERVAL_S and bar.n == 2000
    assert text.count("\r") <= 3 and "2000/2000" in text.replace("2.00k/2.00k", "2000/2000")


def test_a_terminal_keeps_the_one_second_redraw():
    bar, _ = _draws(FakeTerminal())
    assert bar.mininterval == 1.0 and bar.n == 2000
