"""Registers the teaching kit's marks: `pytest -m exercise4` runs the tests of exercise 4 (see EXERCISES.md).

A test carries the mark of the highest-numbered exercise it depends on, so exercise N's tests pass once exercises 1..N
are done. Tests without a mark exercise no cut-out code and pass in the student copy as they are.
"""
EXERCISES = 11


def pytest_configure(config):
    for n in range(1, EXERCISES + 1):
        config.addinivalue_line("markers", f"exercise{n}: the tests graded for exercise {n} (see EXERCISES.md)")
