"""The site daemon: start and stop, leader election, the timers, and the wiring of the rest."""
