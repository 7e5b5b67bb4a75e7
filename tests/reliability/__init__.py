"""The reliability campaign: crash points, random SIGKILL, faults, corruption, fuzzing.

`make reliability` runs the long version (`python -m tests.reliability --help`); `make test`
runs the bounded subset collected by pytest from this package.
"""
