"""launch.step_trace: where a traced step's time went, from torch.profiler's Chrome traces: a GPU trace's kernels by
family (written here as kineto writes them, no GPU needed), a CPU trace's operators by their own time (a real trace)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from launch import step_trace


def _kernel(name: str, ts: float, dur: float, stream: int = 7, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur}


def _gpu_trace() -> dict:
    """Two steps of 1,000 us each on the device: every family once a step, the NCCL kernel on a stream of its own
    overlapping the matmul, and 100 us idle at the end of each step."""
    events = []
    for step, t0 in ((40, 0.0), (41, 1000.0)):
        events.append({"ph": "X", "cat": "user_annotation", "name": f"train step {step}", "pid": 1, "tid": 1,
                       "ts": t0 - 50, "dur": 900})  # the host's range: launches run ahead of the device
        events += [_kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_cublas", t0, 400),
                   _kernel("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", t0 + 200, 300, stream=20),
                   _kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", t0 + 400, 150),
                   _kernel("triton_poi_fused_addmm_gelu_view_1", t0 + 550, 100),
                   _kernel("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", t0 + 650, 100),
                   _kernel("Memcpy HtoD (Pinned -> Device)", t0 + 750, 50, cat="gpu_memcpy"),
                   _kernel("void at::native::vectorized_elementwise_kernel<4, FillFunctor>", t0 + 800, 50),
                   _kernel("some_kernel_of_its_own", t0 + 850, 50)]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 5000})
    return {"traceEvents": events}


def test_a_gpu_traces_kernels_are_summed_by_family_per_step_and_its_busy_time_is_their_union():
    t = step_trace.summarize(_gpu_trace())
    assert (t.source, t.steps) == ("device", 2)
    assert t.span_ms == pytest.approx(0.95)  # the first kernel's start to the last one's end, over two steps
    assert t.busy_ms == pytest.approx(0.9)  # the all-reduce overlaps the matmul: not counted twice
    assert t.families == pytest.approx({"matmul": 0.4, "communication": 0.3, "attention": 0.15, "fused (Triton)": 0.1,
                                        "optimizer": 0.1, "copies": 0.05, "elementwise": 0.05, "other": 0.05})
    assert list(t.families)[:2] == ["matmul", "communication"]  # the largest first
    assert t.line().startswith("device 0.9 ms a step over 2 step(s), busy 95%: matmul 0.4, communication 0.3")
    assert t.top[0] == ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_cublas", pytest.approx(0.4))  # kept by name


def test_a_step_on_the_device_lasts_from_its_start_to_the_next_steps_where_cuda_marked_them():
    """With the steps' ranges as CUDA saw them (gpu_user_annotation), a step is the 1,000 us from one start to the
    next, its 100 us idle at the end included, which the last kernel's end leaves out of the last step."""
    trace = _gpu_trace()
    trace["traceEvents"] += [{"ph": "X", "cat": "gpu_user_annotation", "name": f"train step {step}", "pid": 0,
                              "tid": 7, "ts": t0, "dur": 900} for step, t0 in ((40, 0.0), (41, 1000.0))]
    t = step_trace.summarize(trace)
    assert (t.span_ms, t.busy_ms) == (pytest.approx(1.0), pytest.approx(0.9))
    assert t.families["matmul"] == pytest.approx(0.4)  # the families still of both steps


@pytest.mark.parametrize("name, expected", [
    ("triton_poi_fused__scaled_dot_product_flash_attention_transpose_view_2", "fused (Triton)"),  # SDPA's input copy
    ("triton_poi_fused_all_reduce_0", "fused (Triton)"),
    ("triton_tem_fused_mm_3", "matmul"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>", "attention"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "communication"),
])
def test_inductors_kernels_go_by_their_own_family_before_the_ops_they_are_named_after(name, expected):
    assert step_trace.family(name) == expected


@pytest.mark.slow  # a real profile: a second
def test_a_cpu_traces_operators_count_their_own_time_not_their_childrens(tmp_path):
    """A real trace of two steps of a small model on the CPU: linear's matmuls are counted once, as aten::mm or
    aten::addmm, not again as the aten::linear around them."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    x = torch.randn(512, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(2):
            with record_function(f"train step {step}"):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
    path = tmp_path / "rank0.pt.trace.json"
    prof.export_chrome_trace(str(path))
    t = step_trace.summarize(json.loads(path.read_text()))
    assert (t.source, t.steps) == ("host", 2)
    assert t.families["matmul"] > 0 and t.families["optimizer"] > 0 and t.families["elementwise"] > 0
    assert sum(t.families.values()) == pytest.approx(t.busy_ms) and t.busy_ms <= t.span_ms * 1.01


def test_the_command_reads_a_run_folders_traces_and_says_when_there_is_none(tmp_path, capsys):
    run = tmp_path / "run"
    assert step_trace.main([str(run)]) == 1
    assert "no profiler trace in" in capsys.readouterr().err
    trace = run / "profiles" / "attempt-2" / "rank0.pt.trace.json"
    trace.parent.mkdir(parents=True)
    trace.write_text(json.dumps(_gpu_trace()))
    assert step_trace.main([str(run)]) == 0
    assert capsys.readouterr().out == f"{trace}: device 0.9 ms a step over 2 step(s), busy 95%: matmul 0.4, " \
        "communication 0.3, attention 0.1, fused (Triton) 0.1, optimizer 0.1, copies 0.1, elementwise 0.1, other 0.1\n"
