"""tas_jax: network pruning by Transformable Architecture Search, in JAX.

The main entry points; everything else lives in the layers below
(``core``, ``nets``, ``runtime``, ``steps``, ``baselines``, ``report``,
``programs``), see the README's layout table.
"""

__version__ = "0.2.0"

from tas_jax.core.cost import count
from tas_jax.core.shape_files import load as load_shape
from tas_jax.core.shape_files import preset, resolve
from tas_jax.core.shape_files import save as save_shape
from tas_jax.core.shapes import Shape
from tas_jax.nets.resnet import build as build_network
from tas_jax.nets.surgery import export, inherit
from tas_jax.programs.search import run as search
from tas_jax.programs.train import run as train
from tas_jax.runtime.models import load_model

__all__ = ["Shape", "build_network", "count", "export", "inherit", "load_model", "load_shape", "preset",
           "resolve", "save_shape", "search", "train", "__version__"]
