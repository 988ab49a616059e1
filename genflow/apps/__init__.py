"""The command-line programs, above the library: each module is an app run as ``python -m genflow.apps.<name>``
(train, sample, evaluate, leaderboard, convert, dataset, bench, plot_spd, plot_kinetic). Library code never imports from here."""
