"""Test support that runs with a source checkout and never ships in the wheel.

``testbed.kernel`` is the ``kernel`` driver personality: the real Linux vboxguest driver
(built by ``../shared/realdriver/build.sh`` as a userspace library) in front of the
simulated VMMDev. ``vbox-agent simulate --personality kernel`` imports it on demand.
"""
