"""Column types that mean the same on SQLite and MySQL/MariaDB."""

from __future__ import annotations

from sqlalchemy import Text
from sqlalchemy.dialects import mysql

# MySQL's TEXT stops at 64 KiB; a request body or an upstream answer can be far larger.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
