# Sourced by the bench scripts: `launcher` is the DeepSpeed launcher command, as an array.
# A wheel installed with `pip --target` leaves the `deepspeed` script off PATH; the module is the same launcher.
launcher=(deepspeed)
command -v deepspeed >/dev/null || launcher=(python3 -m deepspeed.launcher.runner)
