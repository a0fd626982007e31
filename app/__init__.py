"""The application above the workflows: the service layer (claims, coupons, wedged coupons),
the command line, the HTTP API, the worker's assembly and the embedded stack. Nothing below
(coupons/, activities/, workflows/) imports from here."""
