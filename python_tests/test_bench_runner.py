"""The runner's bookkeeping: ratios compare implementations of the same workload and dtype; the
target workloads come first and a time budget skips (and records) what it leaves out; the table
lists the workloads in their natural order; the profiler's log lines stay off stderr."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import harness, run  # noqa: E402


def row(impl, dtype, seconds, workload="sam_x"):
    return {"workload": workload, "impl": impl, "dtype": dtype, "median_s": seconds, "floor_bytes": 100,
            "achieved_gbps": 100 / seconds / 1e9}


def test_ratios_pair_rows_of_the_same_dtype():
    rows = [row("fused", "float32", 1.0), row("eager", "float32", 3.0),
            row("fused", "bfloat16", 0.5), row("eager", "bfloat16", 2.0)]
    harness.add_ratios(rows, "fused", copy_bytes_per_s=1e9)
    assert [r["fused_speedup"] for r in rows] == [1.0, 3.0, 1.0, 4.0]
    assert rows[1]["fraction_of_copy_bw"] == rows[1]["achieved_gbps"]


def test_target_workloads_and_then_their_compiled_baselines_come_first():
    cases = run.collect_cases("cpu", quick=False, compiled=True)
    keys = [(c.workload not in run.TARGET_WORKLOADS, c.impl == "compiled") for c in cases]
    assert keys == sorted(keys) and keys[0] == (False, False) and (True, True) in keys
    assert {c.workload for c in cases if c.workload in run.TARGET_WORKLOADS} >= {"sam_resnet56", "sam_vit_b16"}


def test_time_budget_skips_the_remaining_cases_and_records_them(tmp_path, capsys):
    assert run.main(["--quick", "--no-compiled", "--time-budget", "0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["rows"] == []
    assert "sam_resnet56 float32 fused" in result["skipped_for_time"]
    assert len(result["skipped_for_time"]) == len(run.collect_cases("cpu", quick=True, compiled=False))
    assert "not measured (time budget of 0 s spent)" in capsys.readouterr().out


def test_gpu_case_list_holds_every_target_workload():
    """The GPU run (built here without a GPU) measures every workload the targets are read from, first."""
    cases = run.collect_cases("cuda", quick=False, compiled=True)
    targets = [c for c in cases if c.workload in run.TARGET_WORKLOADS]
    assert {c.workload for c in targets} == run.TARGET_WORKLOADS
    assert cases[: len(targets)] == targets


def test_interrupt_keeps_the_measured_rows_and_lists_the_rest(tmp_path, monkeypatch, capsys):
    measure = harness.measure
    calls = []

    def measure_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT from device_check.sh's time limit raises
        return measure(*args, **kwargs)

    monkeypatch.setattr(harness, "measure", measure_then_interrupt)
    assert run.main(["--quick", "--no-compiled", "--min-time", "0.01", "--out", str(tmp_path)]) == 130
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert len(result["rows"]) == 1
    assert len(result["skipped_for_time"]) == len(run.collect_cases("cpu", quick=True, compiled=False)) - 1
    assert "not measured (interrupted)" in capsys.readouterr().out


def test_table_lists_workloads_in_built_order_whatever_the_measurement_order():
    """The targets are measured first; the table still reads SAM, loss, training step, fused first."""
    built = run.build_cases("cpu", quick=False, compiled=True)
    measured = run.collect_cases("cpu", quick=False, compiled=True)
    keys = [(c.workload, c.params["dtype"], c.impl) for c in built]
    assert [(c.workload, c.params["dtype"], c.impl) for c in measured] != keys
    rows = [row(c.impl, c.params["dtype"], 1.0, workload=c.workload) for c in measured]
    harness.add_ratios(rows, "fused", copy_bytes_per_s=1e9)
    table = run.format_table(run.in_built_order(rows, built), copy_gbps=1.0)
    printed = [tuple(line.split()[:3]) for line in table.splitlines()[3:]]  # below the header
    assert printed == keys
    families = [workload.split("_")[0] for workload, _, _ in printed]
    assert families == sorted(families, key=["sam", "loss", "train"].index)
    first_impls = {}
    for workload, _, impl in printed:
        first_impls.setdefault(workload, impl)
    assert set(first_impls.values()) == {"fused"}


def test_step_overhead_below_the_noise_is_not_printed_as_a_negative_share():
    rows = [row("fused", "float32", 1.0, workload="train_step_x"), row("passes", "float32", 1.2, "train_step_x")]
    harness.add_ratios(rows, "fused", copy_bytes_per_s=1e9)
    run.add_step_overhead(rows)
    table = run.format_table(rows, copy_gbps=1.0)
    assert "below this run's timing noise" in table and "-20.0%" not in table
    rows[1]["median_s"] = 0.9
    run.add_step_overhead(rows)
    assert "10.0% of the fused BiSAM step is spent outside" in run.format_table(rows, copy_gbps=1.0)


def test_profiler_logs_stay_off_stderr_and_warnings_still_show():
    """Importing the runner quiets kineto's USDT start/stop lines and c10's note on blocks freed
    inside a memory profile (both through the progress bar before); Python warnings still show."""
    script = """
import warnings
from bench import run  # first, as in `python -m bench.run`: its set-up precedes the torch import
from bench import harness
import torch

state = [torch.ones(1 << 16)]
def replace_state():
    state[0] = torch.ones(1 << 16)  # frees a block allocated before the profile started
harness.count_launches(replace_state, "cpu")
harness.extra_memory(replace_state, "cpu")
warnings.warn("a real warning")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("KINETO_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(run.__file__)),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "Memory block of unknown size" not in done.stderr
    assert "UserWarning: a real warning" in done.stderr


def test_every_sam_workload_has_the_peer_sam_row():
    """pytorch-optimizer's SAM (pinned in requirements-dev.txt) is measured for every SAM workload, so the
    table shows the fused speedup over it; the loss workloads have no such peer."""
    from bench.bench_sam_perturb import PEER, PEERS

    assert PEERS == (PEER,)
    for quick in (True, False):
        cases = run.build_cases("cpu", quick=quick, compiled=False)
        sam = {c.workload for c in cases if c.workload.startswith("sam_")}
        assert sam and {c.workload for c in cases if c.impl == PEER} == sam


def test_peer_sam_case_perturbs_then_restores_the_weights(monkeypatch):
    """The peer row does the fused row's work: perturb, then restore (its base optimizer does not step)."""
    import pytorch_optimizer
    import torch

    from bench.bench_sam_perturb import PEER, RHO, _step

    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    perturbed = []
    second_step = pytorch_optimizer.SAM.second_step

    def record_then_second_step(self, *args, **kwargs):
        perturbed.extend(p.clone() for p in params)
        return second_step(self, *args, **kwargs)

    monkeypatch.setattr(pytorch_optimizer.SAM, "second_step", record_then_second_step)
    _step(PEER)(params, grads, [torch.empty_like(p) for p in params])
    assert len(perturbed) == len(params)
    norm = torch.cat([g.flatten() for g in grads]).norm()
    for w, b, g in zip(perturbed, before, grads):
        torch.testing.assert_close(w, b + RHO * g / norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
