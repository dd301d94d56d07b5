"""Recurrent cores, the language model around them, and the registry behind `--model`.

Importing this package registers every core (`models.CORES`).
"""

from models.core import CORES, Core, State, build_core, detach_state, get_core_class, register_core
from models.lm import LanguageModel, LMConfig, add_lm_args, lm_config_from_args
from models.rnn import GRU, LSTM, GRUState, LSTMState, RNNConfig
from models.awd import AWDConfig, AWDStack
from models.qrnn import QRNN, ForgetMult, QRNNConfig, QRNNCore, QRNNLayer, QRNNState
from models.relational_memory import RMCConfig, RMCCore, RelationalMemory
from models.rnnlib import RNNLibConfig, RNNLibCore
from models.dnc import DNC, SAM, SDNC, DNCConfig, DNCCore, SAMConfig, SAMCore, SDNCConfig, SDNCCore
from models.task_model import SequenceModel, TaskModel, TaskModelConfig

# Model classes a checkpoint can name, with their config dataclass (see training.load_checkpoint).
MODEL_CLASSES = {"LanguageModel": (LanguageModel, LMConfig), "TaskModel": (TaskModel, TaskModelConfig),
                 "SequenceModel": (SequenceModel, TaskModelConfig)}

__all__ = [
    "CORES", "Core", "State", "build_core", "detach_state", "get_core_class", "register_core",
    "LanguageModel", "LMConfig", "add_lm_args", "lm_config_from_args",
    "GRU", "LSTM", "GRUState", "LSTMState", "RNNConfig", "AWDConfig", "AWDStack", "MODEL_CLASSES",
    "ForgetMult", "QRNN", "QRNNConfig", "QRNNCore", "QRNNLayer", "QRNNState", "RMCConfig", "RMCCore", "RelationalMemory",
    "RNNLibConfig", "RNNLibCore",
    "DNC", "SAM", "SDNC", "DNCConfig", "DNCCore", "SAMConfig", "SAMCore", "SDNCConfig", "SDNCCore",
    "SequenceModel", "TaskModel", "TaskModelConfig",
]
