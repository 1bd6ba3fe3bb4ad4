"""Content-Security-Policy of the report pages: nothing from the network, no inline script.

Layer and class names come from the user's model and folders; with this policy even a name that
slipped past escaping could not load or run anything.
"""

CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; base-uri 'none'; "
       "form-action 'none'")
# Layer pages with the interactive explorer: scripts from the report folder only (no inline script, no
# eval: the explorer uses no Bokeh CustomJS); BokehJS styles its shadow-DOM views with <style>
# elements, hence 'unsafe-inline' for styles (no network is allowed, so styles cannot leak anything).
CSP_EXPLORER = ("default-src 'none'; script-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                "base-uri 'none'; form-action 'none'")
