"""Tests of psi_geoopt.convert (a package, so that its conftest is not imported as ``conftest``)."""
