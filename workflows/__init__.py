"""Ray entrypoints that wire :mod:`siamese_core` to object storage, Ray and MLflow."""

import os as _os

# A driver that starts its own single-host Ray must bind it to loopback: on
# machines where Ray picks an address its own driver cannot reach, it retries
# forever. Ray reads this when it is first imported, so it is set here, before
# any workflow imports Ray. Joining a cluster (RAY_ADDRESS set) is unaffected.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
