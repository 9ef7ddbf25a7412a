"""dynroute: CoDiNet dynamic routing (Wang et al., TPAMI 2021) for the ResNets you already train."""

from dynroute import models, plots
from dynroute._version import __version__
from dynroute.accounting import count_distinct_paths, forward_macs, hard_paths, macs_fraction, sample_macs
from dynroute.adapters import BlockAdapter, get_adapter, register_block, registered_block_types
from dynroute.checkpoint import load_dense_state_dict
from dynroute.convert import convert_resnet
from dynroute.export import WithPaths, export_program
from dynroute.flops import MacsTable, build_macs_table, macs_table
from dynroute.gated_block import GatedBlock
from dynroute.losses import (
    ConsistencyLoss,
    CostLoss,
    DiversityLoss,
    consistency_loss,
    cost_loss,
    diversity_loss,
    path_costs,
)
from dynroute.metrics import (
    AugmentationAgreement,
    MacsDistribution,
    RoutingRecord,
    augmentation_agreement,
    collect_routing,
    execution_rate,
    execution_rate_by_class,
    macs_distribution,
    path_agreement,
    prediction_kl,
    similarity_correlation,
)
from dynroute.router import Router, hard_gate, relaxed_gate
from dynroute.routing import force_gates, gated_blocks, routing_logits, routing_paths, set_execution
from dynroute.stage import GatedSequential
from dynroute.summary import RoutingSummary, summary

__all__ = [
    "__version__",
    "models",
    "plots",
    # layers
    "Router",
    "GatedBlock",
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
    # losses
    "ConsistencyLoss",
    "DiversityLoss",
    "CostLoss",
    "consistency_loss",
    "diversity_loss",
    "cost_loss",
    "path_costs",
    # MACs
    "MacsTable",
    "build_macs_table",
    "macs_table",
    "sample_macs",
    "macs_fraction",
    "hard_paths",
    "count_distinct_paths",
    "forward_macs",
    # checkpoints and deployment
    "load_dense_state_dict",
    "WithPaths",
    "export_program",
    # analytics
    "RoutingRecord",
    "MacsDistribution",
    "AugmentationAgreement",
    "collect_routing",
    "execution_rate",
    "execution_rate_by_class",
    "macs_distribution",
    "path_agreement",
    "prediction_kl",
    "similarity_correlation",
    "augmentation_agreement",
    "RoutingSummary",
    "summary",
]
from dynroute.budget import BudgetLoss
from dynroute.data import MultiViewTransform, eval_transform, multiview_collate, train_transform
from dynroute.objective import CoDiNetLoss
from dynroute.training import (
    block_parameters,
    get_stage,
    load_checkpoint,
    router_parameters,
    save_checkpoint,
    set_stage,
)

__all__ += [
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
    "BudgetLoss",
    "CoDiNetLoss",
]
