"""What the tests run in processes of their own, by path (`python tests/helpers/NAME.py ...`), and import from there
(`from helpers.multiprocess_fit import fit_and_record`: pytest puts tests/ on the path)."""
