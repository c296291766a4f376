from tests.training.conftest import toy  # noqa: F401  (the tiny model, toy batches and train config fixture)
