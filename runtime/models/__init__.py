"""The model zoo (`build_model`, `ZOO_NAMES`): small Opacus-ready networks by name."""

from fedkube.runtime.models.zoo import ZOO_NAMES, ModelError, build_model

__all__ = ["ZOO_NAMES", "ModelError", "build_model"]
