"""Models, configuration, weights and prediction."""

from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.decoupled import DecoupledCHGNet
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.heads import HeadsCHGNet
from fastchgnet.model.predict import predict, register_model_adapter
from fastchgnet.model.weights import from_chgnet_model, is_chgnet_model, load_model, save_checkpoint

# predict() takes a reference chgnet.model.CHGNet object too (converted to an exact model)
register_model_adapter(is_chgnet_model, from_chgnet_model)

__all__ = ["CHGNet", "DecoupledCHGNet", "HeadsCHGNet", "CHGNetConfig", "load_model", "predict", "save_checkpoint"]
