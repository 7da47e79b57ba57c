"""imagerec studio: a local web app that turns a folder of photos into a labelled set and a model.

``create_app(project_dir, data)`` gives the FastAPI app; ``serve(...)`` runs it on 127.0.0.1.
The project folder holds ``studio.sqlite`` (images, groups, the undo history, audit decisions,
training runs), the thumbnail cache, training runs and exports.

Layer: above the whole library (clustering, training, evaluation, audit, index), below the CLI.
"""

from ._app import create_app
from ._db import Project
from ._server import serve

__all__ = ["Project", "create_app", "serve"]
