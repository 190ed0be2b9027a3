import logging
import re

from common.log import progress, setup_logging


def test_only_rank_zero_speaks_but_errors_pass_from_every_rank(monkeypatch, capsys):
    setup_logging()
    log = logging.getLogger("training.somewhere")
    monkeypatch.setenv("RANK", "1")
    log.info("from rank 1")
    log.error("rank 1 failed")
    with progress(log, total=3) as bar:
        assert bar.disable
    monkeypatch.setenv("RANK", "0")
    log.info("from rank 0")
    log.warning("careful")
    with progress(log, total=3) as bar:
        assert not bar.disable
    out, err = capsys.readouterr()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # a long run's log says when each line was written
    assert re.fullmatch(stamp + "from rank 0\n", out), out
    lines = [line for line in err.splitlines() if ": " in line and "it/s" not in line]
    assert lines[0] == "error: rank 1 failed"  # a command's last word, as scripts read it: no time before it
    assert len(lines) == 2 and re.fullmatch(stamp + "warning: careful", lines[1]), lines


def test_a_library_s_warning_to_the_root_logger_prints_once_in_the_same_form(capsys):
    setup_logging()
    setup_logging()  # commands and tests set it up more than once: still one line each
    logging.getLogger("inference.somewhere").warning("ours")
    logging.warning("DALI iterator does not support resetting")  # DALI warns on the root logger
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line.split(" ", 2)[2] for line in lines] == ["warning: ours",
                                                        "warning: DALI iterator does not support resetting"], lines
