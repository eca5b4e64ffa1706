"""Networks. Importing this package registers every model with the registry."""
from gradcon_core.models import gradcon_cae  # noqa: F401
from gradcon_core.models import arae_mlp  # noqa: F401
