"""cloakbench: a benchmark harness for face cloaking.

Defenses (cloaks a user applies to their photos) are evaluated against recognizers (the tracker's
face-embedding models) and countermeasures (input transforms, model adaptation). See README.md for the
glossary and the evaluation protocol.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
