"""Networks. Importing this package registers every model with the registry."""
from gradcon_core.models import (
    arae_mlp,  # noqa: F401
    gradcon_cae,  # noqa: F401
)
