"""A pyarrow file system that counts the data files actually opened (wraps a real one)."""

from __future__ import annotations

import threading
from typing import Any

import pyarrow.fs as pafs


class CountingHandler(pafs.FileSystemHandler):
    """Delegates every call to ``inner`` and records the paths of files opened for reading."""

    def __init__(self, inner: pafs.FileSystem) -> None:
        self.inner = inner
        self.opened: list[str] = []
        self._lock = threading.Lock()

    def _note(self, path: str) -> None:
        with self._lock:
            self.opened.append(path)

    def parquet_opened(self) -> set[str]:
        with self._lock:
            return {p for p in self.opened if p.endswith(".parquet")}

    def reset(self) -> None:
        with self._lock:
            self.opened.clear()

    # -- FileSystemHandler ------------------------------------------------------------------
    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> Any:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> Any:
        return self.inner.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.inner.delete_dir_contents("", missing_dir_ok=True)

    def delete_file(self, path: str) -> None:
        self.inner.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.inner.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        self._note(path)
        return self.inner.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        self._note(path)
        return self.inner.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.inner.open_append_stream(path, metadata=metadata)


def counting_fs(root: str) -> tuple[pafs.FileSystem, CountingHandler]:
    """(file system rooted at local folder ``root``, its counter)."""
    handler = CountingHandler(pafs.SubTreeFileSystem(root, pafs.LocalFileSystem()))
    return pafs.PyFileSystem(handler), handler
