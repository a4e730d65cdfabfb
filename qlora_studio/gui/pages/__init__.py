"""The main window's pages: Model, Dataset, Training, GPU Monitor, Export, Runs."""
