import json
import signal

from dist_workers import run_spawn, stop_agreement

from sedit.preemption import StopRequest


def test_stop_signal_only_sets_a_flag_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.agreed()
        signal.raise_signal(signal.SIGUSR1)  # the default action would end the process
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == signal.SIGUSR1 and stop.agreed()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_after_the_checkpoint_stop_signals_are_ignored():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    stop = StopRequest().install()
    try:
        stop.ignore_from_now()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # survives interpreter shutdown
        signal.raise_signal(signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_every_rank_stops_when_one_rank_is_signalled(tmp_path):
    run_spawn(stop_agreement, 2, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["before"] for r in results] == [False, False]
    assert [r["after"] for r in results] == [True, True]
    assert [r["received"] for r in results] == [None, int(signal.SIGUSR1)]
