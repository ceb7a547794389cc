"""Teaching: rendering a graph to an image (``viz``), ``explain`` (a graph's numbers by hand),
the demos (``demo``, ``demo_gpt``) and the exercise grader (``grading``, ``graphlora check``).
"""
