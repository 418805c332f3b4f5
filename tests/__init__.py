import pytest

# The helpers' plain `assert`s report values as the tests' own do; this must run before any
# tests.helpers module is imported (pytest rewrites only modules registered before import).
pytest.register_assert_rewrite("tests.helpers")
