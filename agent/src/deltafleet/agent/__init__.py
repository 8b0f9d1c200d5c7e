"""deltafleet.agent: the device side — verify, fetch, patch, load, activate, report.

Installs without sqlalchemy, alembic, onnx or any server code.
"""

from .config import AgentConfig, load_config
from .errors import AgentError, ConfigError, ModelRuntimeError, UpdateRejected

__all__ = ["AgentConfig", "AgentError", "ConfigError", "ModelRuntimeError", "UpdateRejected",
           "load_config"]
