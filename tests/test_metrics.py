import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynroute

PATHS = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def routed_resnet20() -> nn.Module:
    """A CIFAR ResNet-20 whose routers disagree from image to image (random last layers)."""
    torch.manual_seed(0)
    model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
    for _, block in dynroute.gated_blocks(model):
        nn.init.normal_(block.router.fc2.weight, std=1.0)
        nn.init.zeros_(block.router.fc2.bias)
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return routed_resnet20()


@pytest.fixture(scope="module")
def loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shifts = [3 * torch.randn(4, 3, 1, 1, generator=generator) for _ in range(3)]  # so routers see different inputs
    return [(torch.randn(4, 3, 32, 32, generator=generator) + shift, torch.tensor([0, 1, 2, 1])) for shift in shifts]


class TestExecutionRate:
    """Per-block execution rates against hand-counted paths."""

    def test_hand_counted(self):
        assert dynroute.execution_rate(PATHS).tolist() == [0.75, 0.25, 0.5]

    def test_relaxed_gates_are_thresholded(self):
        assert dynroute.execution_rate(PATHS * 0.4 + 0.3).tolist() == [0.75, 0.25, 0.5]

    def test_by_class(self):
        rates = dynroute.execution_rate_by_class(PATHS, torch.tensor([0, 1, 0, 1]), num_classes=3)
        assert rates[:2].tolist() == [[0.5, 0.0, 1.0], [1.0, 0.5, 0.0]]
        assert torch.isnan(rates[2]).all()

    def test_bad_labels_are_refused(self):
        with pytest.raises(ValueError, match="same samples"):
            dynroute.execution_rate_by_class(PATHS, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
            dynroute.execution_rate_by_class(PATHS, torch.tensor([0, 1, 2, 1]), num_classes=2)


class TestGateEntropy:
    """Mean binary entropy per block, in bits, against the formula summed by hand."""

    def test_against_loop(self):
        probs = torch.tensor([[0.5, 1.0, 0.9], [0.5, 0.0, 0.2]])
        expected = []
        for block in range(probs.shape[1]):
            total = 0.0
            for p in probs[:, block].tolist():
                total += sum(-q * math.log2(q) for q in (p, 1 - p) if q > 0)
            expected.append(total / probs.shape[0])
        got = dynroute.gate_entropy(probs)
        assert got.dtype == torch.float64 and got.shape == (3,)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6)
        assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(0.0, abs=1e-6)

    def test_record_method_reads_run_probs(self, model, loader):
        record = dynroute.collect_routing(model, loader)
        assert torch.equal(record.gate_entropy(), dynroute.gate_entropy(record.run_probs))

    def test_refuses_logits_and_hard_shapes(self):
        with pytest.raises(ValueError, match="softmax"):
            dynroute.gate_entropy(torch.tensor([[2.0, -1.0]]))
        with pytest.raises(ValueError, match="run_probs"):
            dynroute.gate_entropy(torch.rand(4))


class TestPathAgreement:
    """Fraction of equal hard paths, counted by hand."""

    def test_hand_counted(self):
        other = torch.tensor([[0.9, 0.1, 0.8], [1.0, 0.0, 0.0], [0.0, 0.2, 1.0], [0.0, 0.0, 0.0]])
        assert dynroute.path_agreement(PATHS, other) == 0.5
        assert dynroute.path_agreement(PATHS, PATHS) == 1.0

    def test_shapes_must_match(self):
        with pytest.raises(ValueError, match="same shape"):
            dynroute.path_agreement(PATHS, PATHS[:, :2])


class TestPredictionKL:
    """KL(p_a || p_b) of softmax predictions against the formula."""

    def test_hand_computed(self):
        logits_a = torch.tensor([[0.5, 0.5]]).log()
        logits_b = torch.tensor([[0.25, 0.75]]).log() + 3.0  # softmax ignores a shift
        expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
        assert dynroute.prediction_kl(logits_a, logits_b).item() == pytest.approx(expected)

    def test_reductions_against_loop(self):
        a, b = torch.randn(6, 5), torch.randn(6, 5)
        loop = [
            sum(p * math.log(p / q) for p, q in zip(pa.tolist(), pb.tolist()))
            for pa, pb in zip(a.softmax(1).double(), b.softmax(1).double())
        ]
        assert dynroute.prediction_kl(a, b, reduction="none").tolist() == pytest.approx(loop, rel=1e-5, abs=1e-6)
        assert dynroute.prediction_kl(a, b, reduction="sum").item() == pytest.approx(sum(loop))
        assert dynroute.prediction_kl(a, a).item() == pytest.approx(0.0, abs=1e-12)

    def test_bad_reduction(self):
        with pytest.raises(ValueError, match="reduction"):
            dynroute.prediction_kl(PATHS, PATHS, reduction="max")


class TestSimilarityCorrelation:
    """Pearson r over i < j pairs against a brute-force loop."""

    @staticmethod
    def brute_force(features: torch.Tensor, paths: torch.Tensor) -> float:
        x, y = [], []
        for i in range(len(features)):
            for j in range(i + 1, len(features)):
                x.append(F.cosine_similarity(features[i].double(), features[j].double(), dim=0))
                y.append(F.cosine_similarity(paths[i].double(), paths[j].double(), dim=0))
        return torch.corrcoef(torch.stack([torch.stack(x), torch.stack(y)]))[0, 1].item()

    @pytest.mark.parametrize("chunk_size", [1, 3, 1024])
    def test_against_loop(self, chunk_size):
        features, paths = torch.randn(9, 6), torch.rand(9, 4)
        got = dynroute.similarity_correlation(features, paths, chunk_size=chunk_size)
        assert got == pytest.approx(self.brute_force(features, paths), abs=1e-9)

    def test_hand_computed(self):
        # Pairs (0,1), (0,2), (1,2): feature cosines 0, 1, 0; path cosines 0, 1, 0 -> r = 1.
        features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
        paths = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        assert dynroute.similarity_correlation(features, paths) == pytest.approx(1.0)
        # Flipping which pair is similar in path space gives path cosines 1, 0, 0 -> r = -1/2.
        flipped = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
        assert dynroute.similarity_correlation(features, flipped) == pytest.approx(-0.5)

    def test_constant_similarity_is_nan(self):
        assert math.isnan(dynroute.similarity_correlation(torch.randn(5, 3), torch.ones(5, 4)))

    def test_needs_three_samples(self):
        with pytest.raises(ValueError, match="at least 3"):
            dynroute.similarity_correlation(torch.randn(2, 3), torch.rand(2, 4))


class TestMacsDistribution:
    """Per-sample MACs against a loop over the MAC table."""

    def test_against_table(self, model):
        table = dynroute.macs_table(model)
        paths = (torch.rand(6, table.num_blocks) > 0.5).float()
        distribution = dynroute.macs_distribution(paths, table)
        loop = [table.fixed_macs + sum(m for m, u in zip(table.block_macs, row) if u) for row in paths.tolist()]
        assert distribution.samples.tolist() == loop
        assert distribution.fraction == pytest.approx(sum(loop) / len(loop) / table.dense_macs)
        assert distribution.fraction == pytest.approx(dynroute.macs_fraction(paths, table))
        assert distribution.quantiles([0.0, 1.0]).tolist() == [min(loop), max(loop)]


class TestCollectRouting:
    """The record equals what a manual eval loop over the routing state reads."""

    def test_against_manual_loop(self, model, loader):
        model.train()
        record = dynroute.collect_routing(model, loader)
        assert model.training, "collection must restore the model's mode"
        model.eval()
        with torch.no_grad():
            manual = [(model(x), dynroute.routing_paths(model), dynroute.routing_logits(model)) for x, _ in loader]
        model.train()
        assert torch.equal(record.logits, torch.cat([m[0] for m in manual]))
        assert torch.equal(record.paths, torch.cat([m[1] for m in manual]).to(torch.uint8))
        assert torch.allclose(record.run_probs, torch.cat([m[2] for m in manual]).softmax(-1)[..., 1])
        assert torch.equal(record.paths.bool(), record.run_probs > 0.5)
        assert torch.equal(record.labels, torch.cat([y for _, y in loader]))
        assert record.distinct_paths > 1, "random routers should route the images differently"
        assert record.executed_blocks.tolist() == record.paths.sum(1).tolist()
        assert record.macs().samples.tolist() == dynroute.sample_macs(record.paths, record.table).tolist()
        assert record.accuracy == (record.predictions == record.labels).double().mean().item()
        assert repr(record) == (
            f"RoutingRecord(num_samples=12, num_blocks=9, distinct_paths={record.distinct_paths}, labels=True, "
            "features=None)"
        )

    def test_restores_mixed_modes(self, model, loader):
        model.train()
        frozen = model.bn1.eval()
        dynroute.collect_routing(model, loader, max_batches=1)
        assert model.training and not frozen.training
        assert all(block.training and block.block.training for _, block in dynroute.gated_blocks(model))

    def test_augment_is_applied_to_each_image(self, model, loader):
        flipped = [(x.flip(-1), y) for x, y in loader]
        record = dynroute.collect_routing(model, loader, augment=lambda image: image.flip(-1))
        assert torch.equal(record.paths, dynroute.collect_routing(model, flipped).paths)
        assert torch.allclose(record.logits, dynroute.collect_routing(model, flipped).logits, atol=1e-5)

    def test_images_only_encoder_and_max_batches(self, model, loader):
        encoder = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(0))
        images_only = [x for x, _ in loader]
        record = dynroute.collect_routing(model, images_only, encoder=nn.AdaptiveAvgPool2d(2), max_batches=2)
        assert record.labels is None and record.num_samples == 8
        expected = torch.stack([encoder(image.unsqueeze(0)) for x in images_only[:2] for image in x])
        assert torch.allclose(record.features, expected)
        with pytest.raises(ValueError, match="no labels"):
            _ = record.accuracy

    def test_refuses_unconverted_model_and_empty_loader(self, model):
        with pytest.raises(TypeError, match="convert"):
            dynroute.collect_routing(dynroute.models.resnet20(), [torch.randn(1, 3, 32, 32)])
        with pytest.raises(ValueError, match="no batches"):
            dynroute.collect_routing(model, [])


class TestAugmentationAgreement:
    """Agreement and KL under an augmentation against a per-image loop."""

    def test_flip_against_per_image_loop(self, model, loader):
        flip = torch.flip
        result = dynroute.augmentation_agreement(model, loader, augment=lambda image: flip(image, dims=[-1]))
        model.eval()
        agreeing, kls = 0, []
        with torch.no_grad():
            for images, _ in loader:
                for image in images:
                    logits_a = model(image.unsqueeze(0))
                    path_a = dynroute.routing_paths(model)
                    logits_b = model(flip(image, dims=[-1]).unsqueeze(0))
                    agreeing += int(torch.equal(path_a, dynroute.routing_paths(model)))
                    kls.append(dynroute.prediction_kl(logits_a, logits_b).item())
        assert result.num_samples == 12
        assert result.num_agreeing == agreeing
        assert result.agreement == agreeing / 12
        assert result.kl.tolist() == pytest.approx(kls, abs=1e-5)

    def test_identity_always_agrees(self, model, loader):
        result = dynroute.augmentation_agreement(model, loader, augment=lambda image: image)
        assert result.agreement == 1.0
        assert result.mean_kl == pytest.approx(0.0, abs=1e-12)
