"""torch.compile of a converted model: train and eval work, and the graphs it compiles are counted.

The tests use the ``aot_eager`` backend (dynamo's tracing and AOT autograd without inductor's
slow C++ code generation): graph breaks and recompilations come from dynamo, whatever the backend.
"""

import logging
import warnings

import pytest
import torch
from routed_models import RecompileLimitHits, images, routed_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.torch_version import TorchVersion

import dynroute

# One graph needs dynamo to trace the gated blocks' writes to their __dict__: torch 2.4 splits the forward
# into several graphs (same results); one graph is measured on torch 2.14.
ONE_GRAPH = TorchVersion(torch.__version__) >= (2, 14)
# torch 2.7 renamed cache_size_limit and accumulated_cache_size_limit; the old names are aliases since.
_NEW_LIMIT_NAMES = hasattr(torch._dynamo.config, "recompile_limit")
RECOMPILE_LIMIT = "recompile_limit" if _NEW_LIMIT_NAMES else "cache_size_limit"
ACCUMULATED_LIMIT = "accumulated_recompile_limit" if _NEW_LIMIT_NAMES else "accumulated_cache_size_limit"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batches(count: int, size: int = 8) -> list[torch.Tensor]:
    return [images(size, seed=20 + index) for index in range(count)]


def _routed_counts(model, batches) -> set[tuple[int, ...]]:
    counts = set()
    with torch.no_grad():
        for x in batches:
            model(x)
            counts.add(tuple(dynroute.routing_paths(model).sum(0).int().tolist()))
    return counts


@pytest.mark.slow
class TestTrain:
    """Training steps compile to one graph per stage and give eager's logits and gradients."""

    @pytest.mark.parametrize("hard", [False, True], ids=["stage1-relaxed", "stage2-hard-masked"])
    def test_step(self, hard):
        model = routed_model().train()
        eager = routed_model().train()
        for m in (model, eager):
            dynroute.set_execution(m, "masked")  # stage 2 compiles as a static graph; sparse would break it
            for _, block in dynroute.gated_blocks(m):
                block.hard_decisions = hard
                block.router.requires_grad_(not hard)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter)
        for x in _batches(3):
            torch.manual_seed(0)
            out = compiled(x)
            torch.manual_seed(0)
            expected = eager(x)
            out.square().mean().backward()
            expected.square().mean().backward()
            if hard:  # deterministic: the compiled step is the eager step
                torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            assert torch.isfinite(out).all()
        assert counter.frame_count == 1 or not ONE_GRAPH, "one graph for a fixed batch size, no recompilation"
        for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
            if not p.requires_grad:
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if hard:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
class TestEval:
    """Eval: the masked graph compiles once; sparse execution breaks the graph at nonzero and recompiles."""

    def test_masked_compiles_once(self):
        model = routed_model()
        batches = _batches(6)
        assert len(_routed_counts(model, batches)) > 2  # the batches route different numbers of samples
        with torch.no_grad():
            expected = [model(x) for x in batches]
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(dynroute.set_execution(model, "masked"), backend=counter)
        with torch.no_grad():
            for x, reference in zip(batches, expected):
                torch.testing.assert_close(compiled(x), reference, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 1 or not ONE_GRAPH

    def test_sparse_works_and_recompiles_for_new_sub_batch_sizes(self):
        model = routed_model()
        batches = _batches(6)
        with torch.no_grad():
            expected = [model(x) for x in batches]
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter)
        frames = []
        with torch.no_grad():
            for x, reference in zip(batches, expected):
                torch.testing.assert_close(compiled(x), reference, rtol=1e-5, atol=1e-5)
                frames.append(counter.frame_count)
        blocks = len(list(dynroute.gated_blocks(model)))
        assert frames[0] > blocks, "graph breaks at every block's nonzero split the forward"
        assert frames[-1] > frames[0], "a new routed sub-batch size compiles the residual branch again"

    def test_sparse_stages_that_reuse_buffers_match_eager(self):
        model = routed_model(blocks_per_stage=3)  # blocks after the first of a stage write into their input
        batches = _batches(2)
        with torch.no_grad():
            expected = [model(x) for x in batches]
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, reference in zip(batches, expected):
                torch.testing.assert_close(compiled(x), reference, rtol=1e-5, atol=1e-5)
        untraceable = [str(w.message) for w in caught if "Dynamo does not know how to trace" in str(w.message)]
        assert not untraceable, untraceable

    @pytest.mark.parametrize("limit", ["default", "documented"])
    def test_sparse_real_depth_compiles_within_the_documented_limit(self, limit):
        """ResNet-20: the blocks share code objects, whose cache entries outgrow torch's default limit of 8.

        At the default limit some code object falls back to eager within one pass over the batches. With
        the limit the docs give (8 per gated block), none does and outputs equal eager. Two passes over the
        batches warm up (the second still compiled a frame on torch 2.14.1); the third compiles nothing.
        """
        model = routed_model(blocks_per_stage=3)  # dynroute.models.resnet20's 9 blocks, routers centred
        blocks = len(list(dynroute.gated_blocks(model)))
        batches = [images(size, seed=40 + index) for index, size in enumerate((8, 8, 8, 8, 1, 4))]
        assert len(_routed_counts(model, batches)) > 3  # the batches route different numbers of samples
        with torch.no_grad():
            expected = [model(x) for x in batches]
        documented = 8 * blocks
        limits = {RECOMPILE_LIMIT: documented, ACCUMULATED_LIMIT: max(documented, 256)} if limit == "documented" else {}
        passes = 3 if limit == "documented" else 1
        compiled = torch.compile(model, backend="aot_eager")
        hits = RecompileLimitHits()
        dynamo_logger = logging.getLogger("torch._dynamo")
        dynamo_logger.addHandler(hits)
        frames = []
        try:
            with torch._dynamo.config.patch(**limits), torch.no_grad():
                for _ in range(passes):
                    for x, reference in zip(batches, expected):
                        torch.testing.assert_close(compiled(x), reference, rtol=1e-5, atol=1e-5)
                    frames.append(counters["frames"]["total"])
        finally:
            dynamo_logger.removeHandler(hits)
        if limit == "default":
            assert hits.messages, "torch's default limit is expected to fall back on this network"
            return
        assert not hits.messages, hits.messages
        assert frames[2] == frames[1], "after warm-up, the same batches compile nothing new"
