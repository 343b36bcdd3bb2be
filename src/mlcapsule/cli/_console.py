"""Rich consoles that are machine-friendly when the output is not a terminal: no wrapping and no
cut columns (a pipe, a file, or a test runner gets whole lines, so IDs and paths survive)."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

#: The width of output that is not a terminal: wide enough that nothing wraps or is cut.
PIPE_WIDTH = 10_000


class CliConsole(Console):
    @property
    def size(self) -> ConsoleDimensions:
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        if self.is_terminal:
            return dims
        return ConsoleDimensions(max(dims.width, PIPE_WIDTH), dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]
