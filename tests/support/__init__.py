"""What the tests share besides fixtures: the servers they start (PostgreSQL, moto's S3, optuna-dashboard), the
tiny runs tests/conftest.py makes once per session, and torchvision's state_dict listings."""
