"""dynroute: CoDiNet dynamic routing (Wang et al., TPAMI 2021) for the ResNets you already train."""

from dynroute import models
from dynroute._version import __version__
from dynroute.analysis import plots
from dynroute.analysis.accounting import count_distinct_paths, forward_macs, hard_paths, macs_fraction, sample_macs
from dynroute.analysis.evaluation import Evaluation, evaluate
from dynroute.analysis.metrics import (
    AugmentationAgreement,
    MacsDistribution,
    RoutingRecord,
    augmentation_agreement,
    collect_routing,
    execution_rate,
    execution_rate_by_class,
    gate_entropy,
    macs_distribution,
    path_agreement,
    prediction_kl,
    similarity_correlation,
)
from dynroute.analysis.summary import RoutingSummary, summary
from dynroute.conversion import adapters as _adapters  # noqa: F401  (registers the supported block families)
from dynroute.conversion.convert import convert_resnet
from dynroute.conversion.flops import MacsTable, build_macs_table, count_macs, macs_table
from dynroute.conversion.registry import BlockAdapter, get_adapter, register_block, registered_block_types
from dynroute.export.masked import WithPaths, export_masked_program
from dynroute.export.masked import export_program as export_program  # deprecated, not in __all__
from dynroute.export.onnx_layout import optimize_onnx
from dynroute.export.onnx_model import export_onnx
from dynroute.export.pretrained import from_pretrained, push_to_hub, save_pretrained
from dynroute.export.skipping import export_skipping_program
from dynroute.layers.gated_block import GatedBlock, gated_residual
from dynroute.layers.router import Router, hard_gate, relaxed_gate
from dynroute.layers.routing import (
    force_gates,
    gated_blocks,
    routing_decisions,
    routing_logits,
    routing_paths,
    set_decision_offset,
    set_execution,
)
from dynroute.layers.stage import GatedSequential
from dynroute.layers.static_router import StaticRouter
from dynroute.losses.budget import BudgetLoss
from dynroute.losses.cost import CostLoss, cost_loss, path_costs
from dynroute.losses.objective import CoDiNetLoss
from dynroute.losses.path import ConsistencyLoss, DiversityLoss, consistency_loss, diversity_loss
from dynroute.losses.rate import ExecutionRateLoss, execution_rate_loss
from dynroute.training.calibration import calibrate_budget
from dynroute.training.checkpoint import load_checkpoint, load_dense_state_dict, save_checkpoint
from dynroute.training.data import MultiViewTransform, eval_transform, multiview_collate, train_transform
from dynroute.training.stages import block_parameters, get_stage, router_parameters, set_stage

__all__ = [
    "__version__",
    "models",
    "plots",
    # layers
    "Router",
    "StaticRouter",
    "GatedBlock",
    "gated_residual",
    "GatedSequential",
    "relaxed_gate",
    "hard_gate",
    # conversion
    "convert_resnet",
    "BlockAdapter",
    "register_block",
    "get_adapter",
    "registered_block_types",
    # routing state
    "gated_blocks",
    "force_gates",
    "set_execution",
    "routing_paths",
    "routing_logits",
    "routing_decisions",
    "set_decision_offset",
    # losses
    "ConsistencyLoss",
    "DiversityLoss",
    "CostLoss",
    "consistency_loss",
    "diversity_loss",
    "cost_loss",
    "path_costs",
    "ExecutionRateLoss",
    "execution_rate_loss",
    "BudgetLoss",
    "calibrate_budget",
    "CoDiNetLoss",
    # MACs
    "MacsTable",
    "count_macs",
    "build_macs_table",
    "macs_table",
    "sample_macs",
    "macs_fraction",
    "hard_paths",
    "count_distinct_paths",
    "forward_macs",
    # training
    "MultiViewTransform",
    "multiview_collate",
    "train_transform",
    "eval_transform",
    "set_stage",
    "get_stage",
    "router_parameters",
    "block_parameters",
    "save_checkpoint",
    "load_checkpoint",
    "load_dense_state_dict",
    # deployment
    "WithPaths",
    "export_masked_program",
    "export_skipping_program",
    "export_onnx",
    "optimize_onnx",
    "save_pretrained",
    "from_pretrained",
    "push_to_hub",
    # analytics
    "RoutingRecord",
    "MacsDistribution",
    "AugmentationAgreement",
    "collect_routing",
    "execution_rate",
    "execution_rate_by_class",
    "gate_entropy",
    "macs_distribution",
    "path_agreement",
    "prediction_kl",
    "similarity_correlation",
    "augmentation_agreement",
    "RoutingSummary",
    "summary",
    "Evaluation",
    "evaluate",
]
