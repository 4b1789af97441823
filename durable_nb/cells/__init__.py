"""Where a step's cell runs and what it shows: the host (an IPython shell or a plain
namespace), the cell compiled and run as IPython runs one, and the recorder of its outputs."""
