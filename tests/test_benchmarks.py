"""The inference-speed benchmark runs, and the fixed decisions it imposes are the ones it measures."""

import copy
import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

import dynroute

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here, block_breakdown imports it
    spec.loader.exec_module(module)
    return module


bench = _load_script("inference_speed")
breakdown = _load_script("block_breakdown")
floor = _load_script("routing_floor")


@pytest.fixture(scope="module", params=["cifar_resnet20", "resnet26"])
def networks(request):
    """(dense, {"sparse": ..., "masked": ...}, input_size) of a small model of each family."""
    spec = bench.MODELS[request.param]
    spec = bench.ModelSpec(spec.factory, (3, 32, 32), spec.batches)
    dense, routed = bench.build_networks(spec, torch.Generator().manual_seed(0))
    return dense, routed, spec.input_size


def _quick_main(script, *argv: str):
    """``script.main`` with ``--quick`` at one thread (two crawl on shared cores); torch's threads restored."""
    threads = torch.get_num_threads()
    try:
        return script.main(["--quick", "--threads", "1", *argv])
    finally:
        torch.set_num_threads(threads)


def _forward(model, decisions, images):
    override = bench.FixedDecisions(model)
    override.set(bench.decision_columns(decisions))
    try:
        with torch.inference_mode():
            return model(images), dynroute.routing_paths(model)
    finally:
        override.remove()


class TestQuickRun:
    """``--quick`` runs end to end in seconds and prints a sane table."""

    def test_quick_mode_prints_every_row(self, capsys):
        rows = _quick_main(bench, "--repeats", "2")
        out = capsys.readouterr().out
        assert len(rows) == 2 * 2 * 2 * 2  # models x batches x rates x executions
        assert {row.model for row in rows} == set(bench.QUICK_DEFAULTS["models"])
        for row in rows:
            assert 0 < row.macs_ratio < 1
            assert math.isfinite(row.time_ratio) and row.routed_ms > 0
            assert row.max_abs_diff <= 1e-5
            assert f"{row.efficiency:.3f}" in out
        for model in bench.QUICK_DEFAULTS["models"]:  # one dense measurement per model and batch, shared by its rows
            for batch in {row.batch for row in rows if row.model == model}:
                dense_ms = {row.dense_ms for row in rows if (row.model, row.batch) == (model, batch)}
                assert len(dense_ms) == 1 and min(dense_ms) > 0
        assert "efficiency" in out and "max |logits(sparse) - logits(masked)|" in out

    def test_channels_last_runs_networks_and_images_in_nhwc(self, capsys, monkeypatch):
        formats = set()
        run_dense = bench.run_dense

        def recording_run_dense(network, images):
            weight = next(
                m.weight for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size > (1, 1)
            )
            for tensor in (images[0], weight):
                formats.add(tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous())
            return run_dense(network, images)

        monkeypatch.setattr(bench, "run_dense", recording_run_dense)
        rows = _quick_main(bench, "--repeats", "1", "--models", "cifar_resnet20", "--channels-last")
        assert formats == {True}
        assert "channels_last" in capsys.readouterr().out
        assert all(row.max_abs_diff <= 1e-5 for row in rows)

    def test_bad_arguments_are_refused(self):
        for argv in (["--rates", "1.5"], ["--repeats", "0"], ["--batches", "0"], ["--models", "vgg16"]):
            with pytest.raises(SystemExit):
                bench.parse_args(argv)


class TestFixedDecisions:
    """The drawn decisions are the ones that run, with sparse and masked execution alike."""

    def test_batch_one_draws_run_each_image_on_its_own_path(self, networks):
        _, routed, input_size = networks
        model = routed["sparse"]
        decisions = bench.random_decisions(3, dynroute.macs_table(model).num_blocks, 0.5, torch.Generator())
        images = [torch.randn(1, *input_size) for _ in range(3)]
        paths = []
        handle = model.register_forward_hook(lambda module, args, output: paths.append(dynroute.routing_paths(module)))
        override = bench.FixedDecisions(model)
        try:
            with torch.inference_mode():
                columns = [bench.decision_columns(draw) for draw in decisions.split(1)]
                out = bench.run_routed(model, override, columns, images)
        finally:
            override.remove()
            handle.remove()
        assert len({tuple(row.tolist()) for row in decisions}) == 3, "three different paths"
        torch.testing.assert_close(torch.cat(paths), decisions)
        expected = torch.cat([_forward(model, draw, image)[0] for draw, image in zip(decisions.split(1), images)])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    def test_paths_are_the_decisions_and_sparse_equals_masked(self, networks):
        _, routed, input_size = networks
        images = torch.randn(6, *input_size)
        decisions = bench.random_decisions(6, dynroute.macs_table(routed["sparse"]).num_blocks, 0.5, torch.Generator())
        sparse, sparse_paths = _forward(routed["sparse"], decisions, images)
        masked, masked_paths = _forward(routed["masked"], decisions, images)
        torch.testing.assert_close(sparse_paths, decisions, atol=0, rtol=0)
        torch.testing.assert_close(masked_paths, decisions, atol=0, rtol=0)
        torch.testing.assert_close(sparse, masked, atol=1e-5, rtol=0)

    def test_all_run_is_the_dense_original_and_none_is_all_closed(self, networks):
        dense, routed, input_size = networks
        model = routed["sparse"]
        images = torch.randn(3, *input_size)
        num_blocks = dynroute.macs_table(model).num_blocks
        with torch.inference_mode():
            reference, closed = dense(images), dynroute.force_gates(model, "closed")(images)
        dynroute.force_gates(model, None)
        all_run, _ = _forward(model, torch.ones(3, num_blocks), images)
        none_run, _ = _forward(model, torch.zeros(3, num_blocks), images)
        torch.testing.assert_close(all_run, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(none_run, closed, atol=1e-5, rtol=0)
        assert (all_run - none_run).abs().max() > 1e-3, "the comparison needs non-zero residual branches"

    def test_removed_decisions_let_the_routers_decide(self, networks):
        _, routed, input_size = networks
        model = routed["sparse"]
        images = torch.randn(2, *input_size)
        _forward(model, torch.zeros(2, dynroute.macs_table(model).num_blocks), images)
        with torch.inference_mode():
            model(images)
        assert dynroute.routing_paths(model).eq(1).all()  # fresh routers open every gate

    def test_wrong_batch_is_refused(self, networks):
        _, routed, input_size = networks
        model = routed["sparse"]
        with pytest.raises(ValueError, match="forced decisions hold 4 samples but the batch has 2"):
            _forward(model, torch.ones(4, dynroute.macs_table(model).num_blocks), torch.randn(2, *input_size))


class TestTiming:
    """Interleaved timing and paired ratios, on a clock that advances by a known cost per call."""

    def test_interleaved_repeats_and_paired_median_ratio(self):
        now = [0.0]
        order = []

        def variant(name, cost):
            def run():
                order.append(name)
                now[0] += cost.pop(0) if isinstance(cost, list) else cost

            return run

        # The routed variant costs 3 s, then 1 s, then 5 s: paired with a dense 2 s, ratios 1.5, 0.5, 2.5.
        variants = {"dense": variant("dense", 2.0), "routed": variant("routed", [3.0, 1.0, 5.0])}
        options = bench.TimingOptions(
            repeats=3, warmup=0, min_time=0.0, device=torch.device("cpu"), clock=lambda: now[0]
        )
        times = bench.interleaved_times(variants, options)
        assert order == ["dense"] + ["dense", "routed"] * 3  # one call first sizes the measurements
        assert times == {"dense": [2.0, 2.0, 2.0], "routed": [3.0, 1.0, 5.0]}
        assert bench.paired_median_ratio(times["routed"], times["dense"]) == 1.5


class TestDecisionsAndAccounting:
    """Random decisions at a fixed rate, and the MAC ratio written out from the table's fields."""

    def test_every_sample_runs_the_rate_of_blocks_at_random(self):
        decisions = bench.random_decisions(64, 54, 0.7, torch.Generator().manual_seed(1))
        assert decisions.sum(dim=1).eq(round(0.7 * 54)).all()
        assert torch.unique(decisions, dim=0).shape[0] == 64
        assert 0.5 < decisions.mean(dim=0).min() and decisions.mean(dim=0).max() < 0.9
        again = bench.random_decisions(64, 54, 0.7, torch.Generator().manual_seed(1))
        torch.testing.assert_close(decisions, again, atol=0, rtol=0)
        with pytest.raises(ValueError, match="execution rate"):
            bench.random_decisions(2, 4, -0.1, torch.Generator())

    def test_macs_ratio_is_routed_over_dense(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        table = dynroute.macs_table(model)
        decisions = bench.random_decisions(5, table.num_blocks, 0.5, torch.Generator().manual_seed(2))
        per_sample = [
            table.base_macs
            + sum(table.router_macs)
            + sum(macs for macs, run in zip(table.block_macs, row.tolist()) if run)
            for row in decisions
        ]
        expected = sum(per_sample) / len(per_sample) / (table.base_macs + sum(table.block_macs))
        assert bench.macs_ratio(decisions, table) == pytest.approx(expected, rel=1e-12)

    def test_efficiency_is_time_speedup_over_mac_speedup(self):
        row = bench.Row("m", 1, 0.5, "sparse", 10.0, 6.0, macs_ratio=0.5, time_ratio=0.6, max_abs_diff=0.0)
        assert row.efficiency == pytest.approx((1 / 0.6) / (1 / 0.5))


class TestBlockBreakdown:
    """The per-block breakdown feeds each block its real input and times exactly what sparse execution runs."""

    def test_block_inputs_are_what_the_blocks_receive(self):
        dense = dynroute.models.resnet20().eval()
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            inputs = breakdown.block_inputs(dense, ["layer1.0", "layer2.0"], images)
            stem = dense.act(dense.bn1(dense.conv1(images)))
            torch.testing.assert_close(inputs[0], stem, atol=0, rtol=0)
            torch.testing.assert_close(inputs[1], dense.layer1(stem), atol=0, rtol=0)
        assert not dense.layer1[0]._forward_pre_hooks, "the capture hooks are removed"

    @pytest.mark.parametrize("rate", [0.0, 1.0])
    def test_no_gather_when_every_or_no_row_runs(self, rate):
        options = bench.TimingOptions(repeats=1, warmup=0, min_time=0.0, device=torch.device("cpu"))
        spec = bench.ModelSpec(bench.MODELS["cifar_resnet20"].factory, (3, 16, 16), (4,))
        result = breakdown.breakdown(spec, batch=4, rate=rate, options=options, seed=0)
        assert result["rows"] == rate
        assert result["gather"] == 0.0  # no call timed: sparse execution gathers nothing here either
        assert (result["branch routed"] == 0.0) == (rate == 0.0)
        expected = result["dense"] - result["branch all"] + result["branch routed"]
        assert result["promised"] == pytest.approx(expected)
        assert all(result[column] > 0 for column in ("dense", "sparse", "router", "branch all"))

    def test_quick_mode_prints_a_line_per_model_batch_and_rate(self, capsys):
        results = _quick_main(breakdown, "--repeats", "1", "--rates", "0.5")
        out = capsys.readouterr().out
        assert len(results) == 2 * 2  # models x batches
        assert "promised / sparse" in out and len(out.strip().splitlines()) == 2 + 4


class TestRoutingFloor:
    """The batch-1 floors run the same paths as dynroute and give its logits; only the routing machinery differs."""

    def test_quick_run_variants_give_dynroute_logits(self, capsys):
        rows = _quick_main(floor, "--repeats", "1", "--rates", "0.5")
        out = capsys.readouterr().out
        assert [(row.model, row.variant) for row in rows] == [
            (model, variant) for model in bench.QUICK_DEFAULTS["models"] for variant in floor.VARIANTS
        ]
        for row in rows:
            assert row.max_abs_diff <= 1e-5
            assert math.isfinite(row.time_ratio)
            assert (row.time_ratio == 1.0) == (row.macs_ratio == 1.0) == (row.variant == "dense")
            assert f"{row.efficiency:.3f}" in out

    def test_chosen_blocks_follow_the_path(self):
        dense = dynroute.models.resnet20().eval()
        bench.randomize_batchnorm(dense, torch.Generator().manual_seed(0))
        routed = dynroute.convert_resnet(copy.deepcopy(dense), input_size=(3, 32, 32)).eval()
        network, blocks = floor.chosen_network(dense, routed, with_routers=True)
        image = torch.randn(1, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(network(image), dense(image))  # every block runs by default
            for block in blocks:
                block.run = False
            torch.testing.assert_close(network(image), dynroute.force_gates(routed, "closed")(image), atol=1e-6, rtol=0)

    def test_bare_router_gives_the_router_logits(self):
        router = dynroute.Router(24).eval()
        torch.nn.init.normal_(router.fc2.weight)
        x = torch.randn(3, 24, 5, 5)
        assert torch.equal(bench.bare_router(router)(x), router(x))

    def test_other_batches_are_refused(self):
        with pytest.raises(SystemExit, match="batch 1 only"):
            floor.main(["--quick", "--batches", "4"])


def _deploy_script():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="deploy_speed.py needs the export extra: pip install 'dynroute[export]'")
    return sys.modules.get("deploy_speed") or _load_script("deploy_speed")


class TestDeploySpeed:
    """The deployment benchmark times every graph in both runtimes and checks the graphs that skip."""

    def test_fitted_routers_take_the_drawn_paths_and_vary_elsewhere(self):
        deploy = _deploy_script()
        generator = torch.Generator().manual_seed(0)
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        bench.randomize_batchnorm(model, generator)
        images = torch.randn(40, 3, 32, 32, generator=generator)
        decisions = bench.random_decisions(8, 9, 0.5, generator)
        deploy.fit_routers(model, images, decisions, generator)
        with torch.no_grad():
            model(images)
        paths = dynroute.routing_paths(model)
        torch.testing.assert_close(paths[:8], decisions, rtol=0, atol=0)
        others = paths[8:]
        assert len(torch.unique(others, dim=0)) > 8, "the other images take varied paths"
        assert 0.2 < others.mean() < 0.8

    @pytest.mark.slow
    def test_quick_run(self, capsys):
        deploy = _deploy_script()
        rows, checks = _quick_main(deploy, "--check-images", "8")
        out = capsys.readouterr().out
        rates = deploy.QUICK_DEFAULTS["rates"]
        expected = {(runtime, "dense", None) for runtime in deploy.RUNTIMES}
        for runtime, graph, rate in itertools.product(deploy.RUNTIMES, ("masked", "skipping"), rates):
            expected.add((runtime, graph, rate))
        assert {(row.runtime, row.graph, row.rate) for row in rows} == expected
        for row in rows:
            assert row.ms > 0 and math.isfinite(row.time_ratio) and row.time_ratio > 0
            assert (row.macs_ratio == 1.0) == (row.graph == "dense")
            assert f"{row.efficiency:.3f}" in out
        assert {(check.runtime, check.graph) for check in checks} == {
            (runtime, graph) for runtime in deploy.RUNTIMES for graph in ("batch 1", "batch 4")
        }
        assert all(check.passed and check.images == 8 for check in checks)
        assert "checks passed: 4 of 4" in out
