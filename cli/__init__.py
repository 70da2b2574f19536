"""longtrain.cli: the command-line entry points (`longtrain check | prepare | check-data | train |
eval | plan | export | bench`). Each parses its arguments and hands over to the room that does
the work. May import every other room; nothing imports it."""
