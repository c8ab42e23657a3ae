"""Models, configuration, weights and prediction."""

from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.decoupled import DecoupledCHGNet
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.heads import HeadsCHGNet
from fastchgnet.model.predict import predict
from fastchgnet.model.weights import load_model, save_checkpoint

__all__ = ["CHGNet", "DecoupledCHGNet", "HeadsCHGNet", "CHGNetConfig", "load_model", "predict", "save_checkpoint"]
