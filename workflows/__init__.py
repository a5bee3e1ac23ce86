"""Ray entrypoints that wire :mod:`siamese_core` to object storage, Ray and MLflow.

Importing the package changes nothing in the process's environment: settings such as
``AWS_EC2_METADATA_DISABLED`` or ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` belong to the place
that runs a job (the Makefile, ``infra/local_stack.sh``, the tests), never to the library.
"""
