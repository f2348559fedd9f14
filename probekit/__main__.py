"""``python -m probekit`` (also what ``torchrun -m probekit`` runs)."""

from probekit.cli import main

if __name__ == "__main__":
    main()
