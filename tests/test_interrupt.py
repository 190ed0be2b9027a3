"""Ctrl-C stops a command with one line and exit code 130, wherever it lands: torchrun passes a SIGINT on to its
ranks (more than once while it shuts them down), and one landing inside a finalizer (DALI's pipeline ``__del__``
waits for its threads there) would otherwise be printed as a traceback and swallowed, the command going on."""
import signal
import subprocess
import sys
import textwrap

from tests.fixtures import REPO

SCRIPT = textwrap.dedent("""
    import sys, time
    from common.cli import command

    class Pipeline:
        def __del__(self):
            print("finalizing", flush=True)
            time.sleep(float(sys.argv[2]))

    @command
    def main(argv):
        if sys.argv[1] == "inside":  # pipelines built and dropped over and over: Ctrl-C lands in a finalizer
            while True:
                Pipeline()
        held = Pipeline()  # dropped as the command stops
        print("running", flush=True)
        while True:
            time.sleep(0.05)

    main()
""")


def interrupted(where: str, pause: float, signals: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, where, str(pause)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(signals):
        proc.stdout.readline()  # "running" or "finalizing": the next signal lands in the finalizer
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += "\n(still running 20 s after the interrupt)"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_second_interrupt_while_the_command_stops_ends_it_quietly():
    result = interrupted("after", 30, 2)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()][-1].endswith("error: interrupted")


def test_an_interrupt_landing_in_a_finalizer_stops_the_command_rather_than_vanish():
    result = interrupted("inside", 0.5, 1)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "error: interrupted" in result.stderr
