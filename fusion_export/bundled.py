"""Files bundled with fusion_export: the demo's picture and question, the offline calibration questions."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "demo_image.png"
DEMO_QUESTION = "What is in front of the house? Answer briefly."
BUNDLED_QUESTIONS = ASSETS / "calibration_questions.txt"
