"""Analysis of round logs: reports, plots, baselines, sweeps, attacks and audits."""
