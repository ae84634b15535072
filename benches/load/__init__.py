"""The load benchmark of idemproxy against nginx (run it with benches/load.sh).

config: settings from the environment · scenarios: groups and variants · tools: apt-get
installs, versions, the release builds (this tree's, and BASELINE's) · processes: starting,
watching and always stopping servers · servers: the benchmark's servers and HTTP checks ·
measure: wrk, /proc and Redis samples, MONITOR calibration · parse: pure parsers of the tools'
output · report, chart: pure functions from the runs to latest.md, latest.json and latest.svg
(with the A/B against BASELINE) · run: the whole run."""
