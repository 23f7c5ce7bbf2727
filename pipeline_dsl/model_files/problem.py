"""The one error of model_files: a model file or folder that cannot be used."""

from __future__ import annotations


class ModelFileProblem(ValueError):
    """A model file or folder that cannot be used: `path` (the file at fault), `problem`
    (one line: newlines and runs of spaces are folded)."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")
