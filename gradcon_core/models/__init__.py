"""Networks. Importing this package registers every model with the registry."""
from gradcon_core.models import arae_mlp, deep_svdd_net, gradcon_cae, latent_ae  # noqa: F401
