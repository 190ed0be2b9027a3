import logging

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
    assert out == "from rank 0\n"
    assert [line for line in err.splitlines() if ": " in line and "it/s" not in line] == [
        "error: rank 1 failed", "warning: careful"]
