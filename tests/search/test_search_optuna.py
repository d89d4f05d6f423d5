"""search.optuna_search: interrupt/resume on SQLite loses no trial; two worker processes share a PostgreSQL study."""

import itertools
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import ilp
from search.optuna_search import make_storage, params_of, run_study, study_trials_frame
from tests.support.fakes import synthetic_accuracy, synthetic_space

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REPO = Path(__file__).resolve().parents[2]


def _setup(seed=0):
    space = synthetic_space(seed, n_layers=6)
    lo, hi = space.metric_range("bitops")
    cons = [ilp.Constraint("bitops", lo + 0.5 * (hi - lo))]
    seeds = [s.unit_choice for s in ilp.k_best(space, cons, 3)] + [uc for _, uc in ilp.uniform_choices(space)]
    return space, cons, seeds


def test_interrupt_and_resume_loses_no_trial(tmp_path):
    """In the "evaluate" mode every proposal is evaluated (the seeds over the budget too); the repair mode's resume
    is tested in test_search_optuna_infeasible.py."""
    space, cons, seeds = _setup()
    calls = []
    kw = dict(constraints=cons, out_dir=tmp_path, study_name="s", seeds=seeds, infeasible="evaluate")

    def interrupting(cfg):
        calls.append(cfg.digest())
        if len(calls) == 9:
            raise KeyboardInterrupt  # what Ctrl-C does inside an objective
        return synthetic_accuracy(space, cfg), 0.0

    with pytest.raises(KeyboardInterrupt):
        run_study(space, interrupting, n_trials=20, seed=1, **kw)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    before = optuna.load_study(study_name="s", storage=url).get_trials()
    done_before = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    failed = [t for t in before if t.state == TrialState.FAIL]
    assert len(done_before) == 8 and len(failed) == 1

    ok = lambda cfg: (synthetic_accuracy(space, cfg), 0.0)
    study = run_study(space, ok, n_trials=20, seed=1, **kw)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 20
    # the 8 trials completed before the interrupt are all still there, unchanged
    assert all(any(t.number == n and t.values == v for t in complete) for n, v in done_before.items())
    # the interrupted configuration was retried and completed
    assert any(t.params == failed[0].params for t in complete if t.number > failed[0].number)
    # every seed was evaluated exactly once as an enqueued trial (seeds are not re-enqueued on resume)
    keys = [tuple(sorted(t.params.items())) for t in complete]
    for s in seeds:
        assert tuple(sorted(params_of(space, s).items())) in keys
    enq = [t for t in trials if t.system_attrs.get("fixed_params")]
    assert len(enq) == len(seeds) + 1  # seeds + the one re-enqueued failed trial
    df = study_trials_frame(study, space)
    assert len(df) == 20 and df.trial.is_unique
    # resuming a finished study runs nothing
    n = len(study.get_trials())
    run_study(space, ok, n_trials=20, **kw)
    assert len(optuna.load_study(study_name="s", storage=url).get_trials()) == n


def test_constraint_marks_infeasible_trials(tmp_path):
    space, cons, seeds = _setup(3)
    study = run_study(
        space,
        lambda c: (synthetic_accuracy(space, c), 0.0),
        constraints=cons,
        storage=f"journal:{tmp_path / 'j.log'}",
        study_name="j",
        n_trials=12,
        seeds=seeds,
        sampler="tpe",
    )
    df = study_trials_frame(study, space)
    assert len(df) == 12
    for _, r in df.iterrows():
        bitops = space.evaluate(r.unit_choice)["bitops"]
        assert r.feasible == (bitops <= cons[0].limit * (1 + 1e-12))
        assert r.gbitops == pytest.approx(bitops / 1e9)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (Debian package postgresql-15)")
    pytest.importorskip("psycopg2", reason="psycopg2 (pip install psycopg2-binary) is needed for PostgreSQL")
    # a private dir directly under the temp root: pytest's tmp dirs (mode 700, root-owned) are not
    # traversable by the postgres user
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="hasb-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run its binaries as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as a non-root user")
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    r = subprocess.run(
        as_user + [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"initdb failed: {r.stderr[-1000:]}"
    port = _free_port()
    opts = f"-p {port} -k {sock} -c listen_addresses='' -c fsync=off"
    r = subprocess.run(
        as_user + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "-l", str(root / "log"), "start"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"pg_ctl start failed: {r.stderr[-1000:]}"
    try:
        yield f"postgresql://postgres@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run(
            as_user + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


WORKER = textwrap.dedent("""
    import sys, time
    from search import ilp
    from tests.support.fakes import synthetic_accuracy, synthetic_space
    from search.optuna_search import run_study
    url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    space = synthetic_space(0, n_layers=6)
    lo, hi = space.metric_range("bitops")
    cons = [ilp.Constraint("bitops", lo + 0.5 * (hi - lo))]
    seeds = [s.unit_choice for s in ilp.k_best(space, cons, 3)] + [uc for _, uc in ilp.uniform_choices(space)]
    def fn(cfg):
        time.sleep(0.05)      # so the two workers interleave
        return synthetic_accuracy(space, cfg), 0.0
    run_study(space, fn, constraints=cons, storage=url, study_name=name, n_trials=n, seeds=seeds,
              worker=sys.argv[4], seed=int(sys.argv[5]))
""")


def test_two_workers_share_one_postgres_study(postgres, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    n = 30
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), postgres, "shared", str(n), f"w{i}", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_o, e) in zip(procs, outs, strict=False):
        assert p.returncode == 0, e[-2000:]
    study = optuna.load_study(study_name="shared", storage=make_storage(postgres))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    # MaxTrialsCallback stops each worker once n are complete; the other may be mid-trial: at most one extra
    assert n <= len(complete) <= n + 1
    workers = {t.user_attrs.get("worker") for t in complete}
    assert workers == {"w0", "w1"}
    assert len({t.number for t in complete}) == len(complete)
    space, cons, seeds = _setup()
    enq = [t for t in study.get_trials() if t.system_attrs.get("fixed_params") and "repair_of" not in t.user_attrs]
    assert len(enq) == len(seeds)  # seeded once, by the worker that created the study
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # a repair enqueued by one worker just before the other completed the n-th trial may be left queued
    assert all("repair_of" in t.user_attrs for t in study.get_trials(states=(TrialState.WAITING,)))
    assert study_trials_frame(study, space).feasible.all()  # the default mode evaluates nothing over the budget


def test_a_joining_worker_waits_for_the_creators_seeds_instead_of_seeding_twice():
    """The race behind duplicated seeds: a worker that loads the study while its creator is still enqueueing."""
    import threading

    from search.optuna_search import _seeded_by_creator

    study = optuna.create_study(directions=["maximize", "minimize"])
    assert not _seeded_by_creator(study, wait_s=0.3)  # the creator never marked it: the joiner must seed
    timer = threading.Timer(0.3, study.set_user_attr, args=("seeded", True))
    timer.start()
    try:
        assert _seeded_by_creator(study, wait_s=10)  # marked while waiting: the joiner does not seed
    finally:
        timer.cancel()


def test_a_trial_killed_while_running_is_re_enqueued(tmp_path):
    """A RUNNING trial left in SQLite by a killed run (no process will ever finish it): the next run that owns the
    storage fails it and runs its configuration again; a run that does not own it leaves a live trial alone."""
    space, cons, seeds = _setup()
    ok = lambda cfg: (synthetic_accuracy(space, cfg), 0.0)
    kw = dict(constraints=cons, out_dir=tmp_path, study_name="s", seeds=seeds, seed=1)
    run_study(space, ok, n_trials=10, **kw)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="s", storage=url)
    tried = {tuple(sorted(t.params.items())) for t in study.get_trials()}
    # a configuration within the budget no trial has tried yet, suggested by a trial that is then "killed"
    every = itertools.product(range(len(space.choices)), repeat=space.n_units)
    fits = (params_of(space, uc) for uc in every if cons[0].holds(space.evaluate(uc)["bitops"]))
    fresh = next(p for p in fits if tuple(sorted(p.items())) not in tried)
    study.enqueue_trial(fresh)  # the next ask() takes these values
    killed = study.ask()
    labels = [params_of(space, [c] * space.n_units) for c in range(len(space.choices))]  # the objective's choices
    for name in fresh:
        killed.suggest_categorical(name, [lab[name] for lab in labels])
    assert killed.params == fresh
    number = killed.number
    assert study.get_trials()[number].state == TrialState.RUNNING

    # a worker that does not own the storage: a trial with a fresh (or no) heartbeat may be another worker's
    run_study(space, ok, n_trials=10, **kw)
    assert optuna.load_study(study_name="s", storage=url).get_trials()[number].state == TrialState.RUNNING

    done = run_study(space, ok, n_trials=11, reclaim_running=True, **kw).get_trials()
    assert done[number].state == TrialState.FAIL
    rerun = [t for t in done if t.number > number and t.params == done[number].params]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in done) == 11
