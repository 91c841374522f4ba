# Exists until data/validate.py's page is ported to fulltune.report_kit; everything else imports the kit.
from fulltune.report_kit import CSS, write_reports  # noqa: F401
